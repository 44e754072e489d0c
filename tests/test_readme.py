"""Every code block in README.md runs as written, so the README cannot drift.

Blocks are read from README.md when the tests are collected. The only changes made
before running one are the ones in ``SUBSTITUTIONS`` (the real model and dataset
swapped for the tiny ones, smaller calibration budgets) and ``SETUP_COMMANDS``
(setting up the environment the tests already run in). Python and shell blocks
run in a fresh process with a temporary working directory, so relative output
paths land there. A block that cannot run here is marked in the README by an HTML
comment on the line before its fence::

    <!-- readme-test: skip (needs 8 GPUs) -->

and the number of such blocks is capped by ``MAX_SKIPPED``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_SKIPPED = 3
NUM_SAMPLES, SEQ_LEN = 8, 64
TIMEOUT_S = 900

# README text (regex) -> what runs instead, per language; placeholders in braces
# are filled from the test's fixtures.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    # language, README text, replacement
    ("python", r'"path/to/GLM-4\.5-Air"', '"{model}"'),
    (
        "python",
        r'"open_platypus"',
        '__import__("datasets").load_from_disk(r"{dataset_dir}")',
    ),
    (
        "python",
        r"num_calibration_samples=\d+",
        f"num_calibration_samples={NUM_SAMPLES}",
    ),
    ("python", r"max_seq_length=\d+", f"max_seq_length={SEQ_LEN}"),
    ("python", r'"path/to/calibration\.jsonl"', 'r"{dataset_jsonl}"'),
    ("bash", r"path/to/GLM-4\.5-Air", "{model}"),
    ("bash", r"(--dataset\s+)open_platypus", r"\g<1>{dataset_jsonl}"),
    ("bash", r"--num-samples\s+\d+", f"--num-samples {NUM_SAMPLES}"),
    ("bash", r"--seq-len\s+\d+", f"--seq-len {SEQ_LEN}"),
    # two processes (gloo on CPU) for the torchrun examples
    ("bash", r"--nproc_per_node=\d+", "--nproc_per_node=2"),
    # the README's "run the tests" command, without running this test in itself
    (
        "bash",
        r"python -m pytest -q\b",
        "python -m pytest -q {repo}/tests/test_coverage.py",
    ),
]
# Shell commands that set up the environment these tests already run in (and need
# the network): dropped from shell blocks.
SETUP_COMMANDS = [
    r"python3? -m venv \S+",
    r"(\.|source) \S*\.venv/bin/activate",
    r"pip install .+",
]
LANGUAGES = {
    "python": "python",
    "py": "python",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
    "yaml": "yaml",
    "yml": "yaml",
    "toml": "toml",
    "json": "json",
    "": "text",  # untagged: a directory tree, output, ...
    "text": "text",
}
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.language}-L{self.line}"


def extract_blocks(text: str) -> list[Block]:
    """Fenced code blocks with their language and the skip mark above them."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = re.match(r"^(\s*)(```+)\s*([\w+-]*)", lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, tag = opening.groups()
        body, end = [], index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            body.append(lines[end].removeprefix(indent))
            end += 1
        previous = lines[index - 1].strip() if index > 0 else ""
        mark = SKIP_MARK.fullmatch(previous)
        blocks.append(
            Block(
                language=LANGUAGES.get(tag.lower(), f"unknown:{tag}"),
                line=index + 1,
                code="\n".join(body) + "\n",
                skip_reason=mark.group("reason").strip() if mark else None,
            )
        )
        index = end + 1
    return blocks


BLOCKS = [b for b in extract_blocks(README.read_text()) if b.language != "text"]


def blocks_of(*languages: str) -> list:
    return [
        pytest.param(
            block,
            id=block.id,
            marks=(
                [pytest.mark.skip(reason=f"README: {block.skip_reason}")]
                if block.skip_reason is not None
                else []
            ),
        )
        for block in BLOCKS
        if block.language in languages
    ]


def substitute(block: Block, **values: str) -> str:
    code = block.code
    for language, pattern, replacement in SUBSTITUTIONS:
        if language == block.language:
            code = re.sub(pattern, replacement.format(**values), code)
    if block.language == "bash":
        code = _drop_setup_commands(code)
    return code


def _drop_setup_commands(script: str) -> str:
    script = script.replace("\\\n", " ")
    kept_lines = []
    for line in script.splitlines():
        commands = [c.strip() for c in line.split("&&")]
        kept = [
            c for c in commands if not any(re.fullmatch(p, c) for p in SETUP_COMMANDS)
        ]
        if kept:
            kept_lines.append(" && ".join(kept))
    return "\n".join(kept_lines) + "\n"


def is_recipe(data) -> bool:
    """A llmcompressor recipe: stages (``*_stage``) holding ``*_modifiers``."""
    return isinstance(data, dict) and any(
        isinstance(stage, dict) and any(k.endswith("_modifiers") for k in stage)
        for stage in data.values()
    )


# -- fast checks: the extraction, and every block parses --------------------------


def test_extraction_and_skip_marks():
    text = (
        "intro\n```python\nprint(1)\n```\n"
        "<!-- readme-test: skip (needs 8 GPUs) -->\n```bash\ntorchrun x\n```\n"
        "```\ntree/\n```\n"
    )
    python, bash, tree = extract_blocks(text)
    assert (python.language, python.code, python.skip_reason) == (
        "python",
        "print(1)\n",
        None,
    )
    assert (bash.language, bash.line, bash.skip_reason) == ("bash", 6, "needs 8 GPUs")
    assert tree.language == "text"
    kept = _drop_setup_commands(
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" '
        "&& llmcompressor-moe quantize \\\n  --output o\n"
    )
    assert kept.split() == ["llmcompressor-moe", "quantize", "--output", "o"]


def test_readme_has_blocks_and_few_skips():
    languages = {block.language for block in BLOCKS}
    assert {"python", "bash", "yaml"} <= languages, languages
    unknown = [b.id for b in BLOCKS if b.language.startswith("unknown:")]
    assert not unknown, (
        f"README blocks {unknown} have a language this test does not run; teach "
        "tests/test_readme.py to run it or mark the block "
        "'<!-- readme-test: skip (reason) -->'"
    )
    skipped = [(b.id, b.skip_reason) for b in BLOCKS if b.skip_reason is not None]
    assert all(reason for _, reason in skipped), f"a skip needs a reason: {skipped}"
    assert len(skipped) <= MAX_SKIPPED, (
        f"{len(skipped)} README blocks are skipped ({skipped}); make them run"
    )


def test_shipped_recipe_path_is_what_oneshot_takes():
    """The quick start passes ``recipes.path(...)`` to ``oneshot``; llmcompressor
    calls ``.lower()`` on it, so it must be a ``str``, not a ``Path``."""
    from llmcompressor.recipe import Recipe

    import llmcompressor_moe_plugins  # noqa: F401  registers our modifiers
    from llmcompressor_moe_plugins import recipes

    path = recipes.path("glm4_moe_w4a16_gptq")
    assert isinstance(path, str) and Path(path).is_file()
    assert Recipe.create_instance(path).modifiers
    assert recipes.path("glm4_moe_w4a16_gptq.yaml") == path
    with pytest.raises(KeyError, match="Shipped: "):
        recipes.path("no_such_recipe")


@pytest.mark.parametrize("block", blocks_of("python"))
def test_python_block_compiles(block):
    compile(block.code, f"README.md:{block.line}", "exec")


@pytest.mark.parametrize("block", blocks_of("yaml"))
def test_yaml_block_parses(block):
    data = yaml.safe_load(block.code)
    if is_recipe(data):
        from llmcompressor.recipe import Recipe

        import llmcompressor_moe_plugins  # noqa: F401  registers our modifiers

        assert Recipe.create_instance(block.code).modifiers


@pytest.mark.parametrize("block", blocks_of("toml"))
def test_toml_block_parses(block):
    tomllib = pytest.importorskip("tomllib")
    tomllib.loads(block.code)


@pytest.mark.parametrize("block", blocks_of("json"))
def test_json_block_parses(block):
    json.loads(block.code)


# -- slow: run the blocks end to end ------------------------------------------------


@pytest.fixture(scope="module")
def readme_inputs(glm4_dir, calibration_data, tokenizer, tmp_path_factory):
    """The tiny model and the calibration data, as paths a README block takes."""
    root = tmp_path_factory.mktemp("readme-inputs")
    calibration_data.save_to_disk(str(root / "calibration"))
    texts = [tokenizer.decode(row["input_ids"]) for row in calibration_data]
    jsonl = root / "calibration.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {
        "model": str(glm4_dir),
        "dataset_dir": str(root / "calibration"),
        "dataset_jsonl": str(jsonl),
        "repo": str(REPO),
    }


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # `python` and `llmcompressor-moe` are this environment's
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-8000:]}"
    )
    return result


# A block that builds ``recipe`` without running it: run it on the tiny model too.
RUN_RECIPE = """
if "recipe" in globals() and "oneshot(" not in {code!r}:
    from llmcompressor import oneshot
    import llmcompressor_moe_plugins
    oneshot(
        model={model!r},
        dataset=__import__("datasets").load_from_disk({dataset_dir!r}),
        recipe=recipe,
        output_dir="readme-recipe-out",
        num_calibration_samples={samples},
        max_seq_length={seq_len},
    )
"""


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks_of("python"))
def test_python_block_runs(block, readme_inputs, tmp_path):
    code = substitute(block, **readme_inputs)
    code += RUN_RECIPE.format(
        code=block.code, samples=NUM_SAMPLES, seq_len=SEQ_LEN, **readme_inputs
    )
    script = tmp_path / "block.py"
    script.write_text(code)
    run([sys.executable, str(script)], cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks_of("bash"))
def test_bash_block_runs(block, readme_inputs, tmp_path):
    script = substitute(block, **readme_inputs)
    run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks_of("yaml"))
def test_yaml_recipe_runs(block, readme_inputs, tmp_path):
    if not is_recipe(yaml.safe_load(block.code)):
        pytest.skip("not a recipe")
    (tmp_path / "recipe.yaml").write_text(block.code)
    script = (
        "import datasets, llmcompressor_moe_plugins\n"
        "from llmcompressor import oneshot\n"
        "from llmcompressor_moe_plugins import cpu_only_calibration\n"
        "with cpu_only_calibration():\n"
        f"    oneshot(model={readme_inputs['model']!r},\n"
        f"        dataset=datasets.load_from_disk({readme_inputs['dataset_dir']!r}),\n"
        "        recipe='recipe.yaml', output_dir='out',\n"
        f"        num_calibration_samples={NUM_SAMPLES}, max_seq_length={SEQ_LEN})\n"
        "report = llmcompressor_moe_plugins.last_coverage_report()\n"
        "assert report is not None and report.blocks, report\n"
    )
    run([sys.executable, "-c", script], cwd=tmp_path)
    assert (tmp_path / "out" / "config.json").is_file()


# -- "Adding an architecture": the template, as written ---------------------------


def _template_source() -> str:
    text = README.read_text()
    start = text.index(
        "```python\nfrom llmcompressor_moe_plugins import MoECalibrationModule"
    )
    return text[start + len("```python\n") : text.index("```", start + 10)]


class _Gate(__import__("torch").nn.Module):
    """A router returning ``(logits, weights, indices)``, as the template reads."""

    def __init__(self, hidden: int, experts: int, k: int, scoring: str):
        import torch

        super().__init__()
        self.proj = torch.nn.Linear(hidden, experts, bias=False)
        self.k, self.scoring = k, scoring

    def forward(self, hidden_states):
        logits = self.proj(hidden_states.view(-1, hidden_states.shape[-1]))
        if self.scoring == "softmax":
            weights, indices = logits.softmax(dim=-1).topk(self.k)
        else:
            weights, indices = logits.sigmoid().topk(self.k)
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, indices


def _my_moe_block(scoring: str, hidden=16, experts=8, k=2):
    import torch

    from llmcompressor_moe_plugins.models.textbook_moe import TextbookExpert

    class MyMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = _Gate(hidden, experts, k, scoring)
            self.experts = torch.nn.ModuleList(
                TextbookExpert(hidden, 24) for _ in range(experts)
            )
            self.shared_experts = TextbookExpert(hidden, 24)

        def forward(self, hidden_states):
            flat = hidden_states.view(-1, hidden_states.shape[-1])
            _, weights, indices = self.gate(hidden_states)
            out = torch.zeros_like(flat)
            for slot in range(indices.shape[1]):
                for e in range(experts):
                    rows = indices[:, slot] == e
                    if rows.any():
                        out[rows] += weights[rows, slot, None] * self.experts[e](
                            flat[rows]
                        )
            return out.view(hidden_states.shape) + self.shared_experts(hidden_states)

    return MyMoeBlock()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_adding_an_architecture_template_runs_as_written(scoring, plugin_path):
    """The README's module, registered for a block of that shape, under the
    default mode (weighted:2 with its floor): outputs equal the block's own, and
    every expert is calibrated on at least the floor's tokens, which needs the
    template's scores (the README once passed ``logits.softmax``: TypeError)."""

    import llmcompressor_moe_plugins

    namespace: dict = {}
    exec(compile(_template_source(), "README.md", "exec"), namespace)
    llmcompressor_moe_plugins.register("MyMoeBlock", namespace["CalibrationMyMoeBlock"])
    try:
        _run_template_block(scoring)
    finally:
        from llmcompressor_moe_plugins.calibration.registry import unregister

        unregister("MyMoeBlock")


def _run_template_block(scoring: str) -> None:
    import torch

    from llmcompressor_moe_plugins import defaults, moe_calibration_context

    torch.manual_seed(0)
    model = torch.nn.Sequential(_my_moe_block(scoring))
    tokens = torch.randn(2, 32, 16)
    expected = model(tokens)
    seen = {e: 0 for e in range(8)}
    hooks = [
        expert.gate_proj.register_forward_hook(
            lambda _m, args, _o, e=e: seen.__setitem__(e, seen[e] + args[0].shape[0])
        )
        for e, expert in enumerate(model[0].experts)
    ]
    with moe_calibration_context(
        model, mode=defaults.DEFAULT_MODE, floor=defaults.DEFAULT_FLOOR
    ) as swapped:
        assert type(model[0]).__name__ == "CalibrationMyMoeBlock"
        got = model(tokens)
    for hook in hooks:
        hook.remove()
    assert len(swapped.blocks) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert min(seen.values()) >= defaults.DEFAULT_FLOOR, seen


# -- sections a new user looks for -------------------------------------------------


@pytest.mark.parametrize(
    ("section", "must_say"),
    [
        ("## Serving the result", ["vllm serve", "--speculative-config", "not run"]),
        ("## What a real model needs", ["Estimates", "GLM-4.5-Air", "DeepSeek-V3"]),
        ("### Quick start without the network", ["HF_HUB_OFFLINE", "load_dataset"]),
        (
            "## Set up and run",
            ['-m "not slow"', "at most 5 minutes", "s wall on an idle 2-core"],
        ),
    ],
)
def test_readme_sections_exist(section, must_say):
    text = README.read_text()
    assert section in text
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    for words in must_say:
        assert words in body, words


def test_real_model_table_covers_every_model_with_its_arithmetic():
    text = README.read_text().split("## What a real model needs", 1)[1]
    text = text.split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    models = ["GLM-4.5-Air", "GLM-4.5 / 4.6 / 4.7", "Qwen3-30B-A3B"]
    models += ["Qwen3-235B-A22B", "DeepSeek-V3"]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == models
    for row in rows:  # every estimate shows its arithmetic
        assert " x 60 s" in row and "x 4 B" in row, row


def test_serving_commands_cover_every_shipped_quantized_recipe():
    from llmcompressor_moe_plugins import recipes

    text = README.read_text().split("## Serving the result", 1)[1].split("\n## ")[0]
    for name in recipes.names():
        if name.startswith("glm4_moe_"):
            assert f"`{name}`" in text, name

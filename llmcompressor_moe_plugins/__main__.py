import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before the CLI started: the same one line
    print("llmcompressor-moe: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())

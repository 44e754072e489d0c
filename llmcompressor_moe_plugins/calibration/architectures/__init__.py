"""One calibration module per MoE architecture. Registered through entry points
(see pyproject.toml); importing this package registers nothing."""

"""Where the weights live between phases: plans chosen from a VRAM budget, applied by a policy."""

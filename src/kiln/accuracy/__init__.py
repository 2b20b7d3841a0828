"""How far an engine's outputs are from the fp32 reference: numerics, per-task judges (tasks/), budgets, layer sensitivity."""

"""What the DVC stages call beyond one role: the stage runner, the params checks, engine folders, the calibrate
driver, code digests, and quickrun (the same steps in one process, without DVC)."""

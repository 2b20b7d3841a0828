"""What every other part leans on and that knows nothing of models: errors, atomic writes, hashing, result paths, settings parsing."""

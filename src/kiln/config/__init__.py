"""params.yaml: its composition from conf/ (params), the typed views stages read (views), each stage's slice (slices)."""

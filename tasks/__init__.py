"""Tasks: one module and one YAML (`conf/task/<name>.yaml`) each."""

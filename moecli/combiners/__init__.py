"""Named combiners: one module and one YAML (`conf/combiner/<name>.yaml`) each. The config group is the registry."""

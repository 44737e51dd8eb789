# The config tree; installed as the data package `moecli.conf` (see pyproject.toml).

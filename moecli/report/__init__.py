"""Views of the one metrics dictionary: console (rich), files (the run record), wandb; and `moecli compare`."""

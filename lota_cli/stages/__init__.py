"""One module per stage: each reads top to bottom as set-up, work, save, and returns the paths it wrote."""

"""Empty: lmms-eval adds each plugin's `tasks` folder to its include path, so one must exist."""

"""The console's screens: the main one, one execution, and the prompts."""

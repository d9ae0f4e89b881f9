"""One module per dataset layout; each turns options into SplitSource objects."""

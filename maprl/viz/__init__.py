"""Pictures: map previews, trajectory plots and episode GIFs (numpy and matplotlib only)."""

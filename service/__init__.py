"""boothd service package."""

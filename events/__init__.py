"""boothd events package."""

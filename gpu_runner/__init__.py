"""boothd gpu_runner package."""

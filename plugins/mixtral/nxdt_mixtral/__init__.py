"""nxdt-mixtral plugin package."""

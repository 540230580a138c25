"""Device meshes and the one place where logical axis names become mesh axes."""

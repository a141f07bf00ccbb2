"""What a trial chooses and what it builds: search spaces, networks, augmentation."""

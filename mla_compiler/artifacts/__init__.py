"""What the backend leaves behind for people: report text, dump folders, the dump page."""

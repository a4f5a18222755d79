"""What a user sees of a job: the progress display, the summary, status and validate."""

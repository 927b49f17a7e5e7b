"""The worker process: claims jobs of one queue, runs them on slots, keeps their leases alive
and writes their outcomes in batches."""

// The partition worker.

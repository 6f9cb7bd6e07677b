"""The CleanDIFT feature service: FastAPI front end, Redis Streams queue, batching workers."""

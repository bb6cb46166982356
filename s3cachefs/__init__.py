"""s3cachefs: an S3 bucket as Synapse's media store, with a local disk cache and synchronous write-through."""

__version__ = "0.1.0"

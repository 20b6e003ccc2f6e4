"""ivfast: fast training of InternVideo-Next style video foundation models."""
__version__ = "0.1.0"

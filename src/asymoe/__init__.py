"""asymoe: mixture-of-experts vision-language models on one Lightning code base."""

__version__ = "0.1.0"

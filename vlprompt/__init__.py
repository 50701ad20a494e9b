"""vlprompt: prompt learning on frozen vision-language encoders."""

__version__ = "0.1.0"

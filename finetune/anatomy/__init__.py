"""ViSD-Boost anatomy normality modelling for CT vision-language learning (docs/anatomy.md)."""

"""Prefect flows of Saliency Atlas and the ``saliency-atlas`` command line."""

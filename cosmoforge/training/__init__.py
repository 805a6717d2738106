"""Training and evaluation: the last stretch of the Cosmopedia recipe, dataset to scored model.

The blog proved the data by training cosmo-1b with datatrove (tokenization), nanotron (training)
and lighteval (evaluation); this package drives the same three tools from `spec.training`. The
GPU path renders a nanotron config and a Kubernetes Job; the CPU path trains a tiny Llama on the
same token files, so the whole chain can be checked on a laptop.

Modules import their heavy dependencies (torch, datatrove, transformers, lighteval) inside
functions, so importing this package stays cheap for the CLI.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Input that cannot be trained or evaluated on, found before any work starts.

    The message is one line a user can act on; the CLI prints it and exits with status 2.
    """

"""Publishing a run's final dataset on the Hugging Face Hub.

Split by layer: `files` lays the documents out as the Hub reads them (one config per seed
source, deterministic parquet files), `card` renders the dataset card from what was counted
(pure), `hub` makes a repo hold a set of local files in chunked, resumable commits, and `run`
ties them to a run's folder for `cosmo push` and the operator's publish stage.
"""

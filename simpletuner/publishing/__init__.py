"""What a finished run hands to other people: the model card (``README.md`` in ``--output_dir``) and
the uploads to a Hugging Face Hub repository (``--push_to_hub``)."""

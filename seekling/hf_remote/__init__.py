"""Files that seekling writes into an mHC checkpoint so that transformers can load it with
`trust_remote_code=True` (config.json's `auto_map` names them). They import only torch and
transformers, never seekling, and seekling never imports them: `checkpoint.save` copies their text.
"""

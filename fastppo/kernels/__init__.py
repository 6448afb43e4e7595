"""`fastppo.kernels` in a source checkout and an editable install: the Triton kernels live in the repository's
top-level `kernels/` folder, and this package's path points there.

That folder has no `__init__.py` on purpose (see kernels/launch.py): from the repository root, where the checkout is
on `sys.path`, a regular package there would be imported in place of Hugging Face's `kernels`, which transformers
imports. A built wheel carries the kernels in fastppo/kernels/ itself (pyproject.toml maps the folder there) and does
not contain this file.
"""

import os

_checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_checkout_kernels = os.path.join(_checkout, "kernels")
if os.path.isdir(_checkout_kernels):
    __path__.append(_checkout_kernels)

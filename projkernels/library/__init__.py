"""How the kernels meet PyTorch: the Python autograd of the penalty family (``autograd``, eager; and
``multi_autograd`` for many weights), the torch.func route (``functional``), the torch.compile custom
ops (``custom_ops``) and every fake kernel (``fakes``).  The compiled backends' autograd is C++."""

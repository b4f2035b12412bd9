"""`python -m cni_plugin` behaves exactly like the `tortie` binary."""
from .main import main

main()

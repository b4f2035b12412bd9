"""`python -m cni_plugin` behaves exactly like the `tortie` binary."""
from cni_plugin.main import main

main()

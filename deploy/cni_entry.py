"""PyInstaller entry for the tortie CNI binary (deploy/build-cni.sh)."""
from cni_plugin.main import main

if __name__ == "__main__":
    main()

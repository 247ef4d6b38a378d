import sys

from flannel_bpf.cli.main import main

sys.exit(main())

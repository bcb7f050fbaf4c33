import sys

from MedCLIPSAMLib.cli import main

sys.exit(main())

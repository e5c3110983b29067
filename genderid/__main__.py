import sys

from genderid.cli import main

sys.exit(main())

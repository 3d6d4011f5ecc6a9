"""`python -m mobile_app [classify|run|bundle] ...`."""
from mobile_app.cli import main

raise SystemExit(main())

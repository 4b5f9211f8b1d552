from callout.cli import main

raise SystemExit(main())

from rto.cli import main

raise SystemExit(main())

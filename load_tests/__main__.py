from epserve.load_tests.cli import main

raise SystemExit(main())

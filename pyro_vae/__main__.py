from pyro_vae.cli import main

raise SystemExit(main())

from circuit_merge_plugin.demo.run import main

if __name__ == "__main__":
    raise SystemExit(main())

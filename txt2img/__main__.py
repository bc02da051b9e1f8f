from txt2img.cli import main

main()

from services.retrieval.server import main

main()

from services.profile.server import main

main()

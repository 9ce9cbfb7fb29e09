"""Fixed vocabularies of the social-search generator (`ebr.datasets.social`): the shared name
pool, the nickname table, the geography (cities grouped into regions and countries, languages
per country) and the words groups, pages and events are named from.

Everything is a tuple so iteration order is fixed: the generator's output depends on the seed
only, never on hash order.
"""
from __future__ import annotations

# (first name, gender). Order is the popularity order: the generator draws them Zipf-like, so
# names near the top are shared by many people (the ambiguity the paper's searcher context
# resolves, section 1).
FIRST_NAMES: tuple[tuple[str, str], ...] = tuple(
    (n, "m") for n in (
        "john", "michael", "james", "david", "robert", "william", "daniel", "christopher",
        "jon", "joseph", "thomas", "matthew", "anthony", "mark", "steven", "andrew", "paul",
        "joshua", "kevin", "brian", "jonathan", "richard", "alex", "charles", "edward", "ryan",
        "jacob", "nicholas", "benjamin", "samuel", "alexander", "timothy", "gregory", "jose",
        "carlos", "luis", "juan", "miguel", "ahmed", "mohammed", "ali", "wei", "hiroshi",
        "raj", "arjun", "pierre", "jean", "hans", "lukas", "marco", "luca", "ivan", "dmitri",
        "frederick", "lawrence", "ronald", "donald", "douglas", "kenneth", "raymond", "gerald",
        "peter", "leonard", "theodore", "zachary", "bill", "mike", "tony", "chris", "tom",
        "patrick", "sean", "adam", "eric", "stephen", "jeffrey", "scott", "jason",
    )
) + tuple(
    (n, "f") for n in (
        "mary", "jennifer", "elizabeth", "linda", "patricia", "susan", "jessica", "sarah",
        "karen", "nancy", "margaret", "lisa", "emily", "michelle", "kimberly", "amanda",
        "katherine", "rebecca", "deborah", "victoria", "alexandra", "christina", "abigail",
        "stephanie", "laura", "anna", "maria", "sofia", "lucia", "fatima", "aisha", "mei",
        "yuki", "priya", "ananya", "marie", "claire", "julia", "lena", "giulia", "olga",
        "natalia", "kate", "liz", "jenny", "nicole", "rachel", "hannah", "olivia", "emma",
        "isabella", "grace", "chloe", "zoe", "megan", "lauren", "samantha", "ashley",
    )
)

LAST_NAMES: tuple[str, ...] = (
    "smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "rodriguez",
    "martinez", "hernandez", "lopez", "gonzalez", "wilson", "anderson", "thomas", "taylor",
    "moore", "jackson", "martin", "lee", "perez", "thompson", "white", "harris", "sanchez",
    "clark", "ramirez", "lewis", "robinson", "walker", "young", "allen", "king", "wright",
    "scott", "torres", "nguyen", "hill", "flores", "green", "adams", "nelson", "baker", "hall",
    "rivera", "campbell", "mitchell", "carter", "roberts", "gomez", "phillips", "evans",
    "turner", "diaz", "parker", "cruz", "edwards", "collins", "reyes", "stewart", "morris",
    "morales", "murphy", "cook", "rogers", "gutierrez", "ortiz", "morgan", "cooper", "peterson",
    "bailey", "reed", "kelly", "howard", "ramos", "kim", "cox", "ward", "richardson", "watson",
    "brooks", "chavez", "wood", "james", "bennett", "gray", "mendoza", "ruiz", "hughes",
    "price", "alvarez", "castillo", "sanders", "patel", "myers", "long", "ross", "foster",
    "jimenez", "powell", "jenkins", "perry", "russell", "sullivan", "bell", "coleman",
    "butler", "henderson", "barnes", "gonzales", "fisher", "vasquez", "simmons", "romero",
    "jordan", "patterson", "alexander", "hamilton", "graham", "reynolds", "griffin", "wallace",
    "moreno", "west", "cole", "hayes", "bryant", "herrera", "gibson", "ellis", "tran",
    "medina", "aguilar", "stevens", "murray", "ford", "castro", "marshall", "owens", "harrison",
    "fernandez", "mcdonald", "woods", "washington", "kennedy", "wells", "vargas", "henry",
    "chen", "freeman", "webb", "tucker", "guzman", "burns", "crawford", "olson", "simpson",
    "porter", "hunter", "gordon", "mendez", "silva", "shaw", "snyder", "mason", "dixon",
    "munoz", "hunt", "hicks", "holmes", "palmer", "wagner", "black", "robertson", "boyd",
    "rose", "stone", "salazar", "fox", "warren", "mills", "meyer", "rice", "schmidt",
    "garza", "daniels", "ferguson", "nichols", "stephens", "soto", "weaver", "ryan", "gardner",
    "payne", "grant", "dunn", "kumar", "singh", "sharma", "wang", "zhang", "li", "liu",
    "yamamoto", "tanaka", "sato", "muller", "schneider", "fischer", "weber", "dubois",
    "laurent", "bernard", "rossi", "russo", "ferrari", "ivanov", "petrov", "santos",
    "oliveira", "costa", "pereira", "khan", "ahmed", "hassan", "kowalski", "novak",
)

# Formal first name -> nicknames people type instead (jonathan -> jon). The legacy boolean
# engine knows nothing of these, so a nickname query misses the formal-name document.
NICKNAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("jonathan", ("jon", "johnny")), ("john", ("johnny", "jack")),
    ("william", ("bill", "will", "billy")), ("robert", ("bob", "rob", "bobby")),
    ("richard", ("rick", "rich", "dick")), ("michael", ("mike", "mikey")),
    ("christopher", ("chris", "topher")), ("james", ("jim", "jimmy", "jamie")),
    ("thomas", ("tom", "tommy")), ("joseph", ("joe", "joey")), ("daniel", ("dan", "danny")),
    ("matthew", ("matt",)), ("anthony", ("tony",)), ("andrew", ("andy", "drew")),
    ("steven", ("steve",)), ("stephen", ("steve",)), ("edward", ("ed", "eddie", "ted")),
    ("benjamin", ("ben", "benny")), ("samuel", ("sam", "sammy")), ("alexander", ("alex", "xander")),
    ("nicholas", ("nick", "nicky")), ("timothy", ("tim", "timmy")), ("jacob", ("jake",)),
    ("gregory", ("greg",)), ("zachary", ("zach", "zack")), ("charles", ("charlie", "chuck")),
    ("frederick", ("fred", "freddie")), ("lawrence", ("larry",)), ("ronald", ("ron", "ronnie")),
    ("donald", ("don", "donnie")), ("douglas", ("doug",)), ("kenneth", ("ken", "kenny")),
    ("raymond", ("ray",)), ("gerald", ("jerry",)), ("peter", ("pete",)),
    ("leonard", ("leo", "len")), ("theodore", ("ted", "teddy", "theo")), ("joshua", ("josh",)),
    ("jeffrey", ("jeff",)), ("patrick", ("pat",)), ("david", ("dave", "davey")),
    ("elizabeth", ("liz", "beth", "betty", "lizzy")), ("katherine", ("kate", "kathy", "katie")),
    ("margaret", ("maggie", "peggy", "meg")), ("jennifer", ("jen", "jenny")),
    ("jessica", ("jess", "jessie")), ("rebecca", ("becky", "becca")),
    ("patricia", ("pat", "patty", "trish")), ("susan", ("sue", "susie")),
    ("deborah", ("deb", "debbie")), ("victoria", ("vicky", "tori")),
    ("alexandra", ("alex", "sasha", "lexi")), ("christina", ("chris", "tina")),
    ("kimberly", ("kim",)), ("abigail", ("abby",)), ("samantha", ("sam", "sammie")),
    ("stephanie", ("steph",)), ("nicole", ("nikki",)), ("natalia", ("natasha", "nata")),
    ("isabella", ("bella", "izzy")), ("olivia", ("liv",)), ("megan", ("meg",)),
)

# (city, region, country). Cities are drawn Zipf-like in this order within the generator.
CITIES: tuple[tuple[str, str, str], ...] = (
    ("new york", "new york", "united states"), ("los angeles", "california", "united states"),
    ("london", "england", "united kingdom"), ("sao paulo", "sao paulo", "brazil"),
    ("mumbai", "maharashtra", "india"), ("paris", "ile-de-france", "france"),
    ("mexico city", "cdmx", "mexico"), ("chicago", "illinois", "united states"),
    ("toronto", "ontario", "canada"), ("berlin", "berlin", "germany"),
    ("madrid", "madrid", "spain"), ("seattle", "washington", "united states"),
    ("san francisco", "california", "united states"), ("bangalore", "karnataka", "india"),
    ("rio de janeiro", "rio de janeiro", "brazil"), ("barcelona", "catalonia", "spain"),
    ("manchester", "england", "united kingdom"), ("munich", "bavaria", "germany"),
    ("montreal", "quebec", "canada"), ("austin", "texas", "united states"),
    ("houston", "texas", "united states"), ("guadalajara", "jalisco", "mexico"),
    ("pune", "maharashtra", "india"), ("marseille", "provence", "france"),
    ("glasgow", "scotland", "united kingdom"), ("edinburgh", "scotland", "united kingdom"),
    ("tacoma", "washington", "united states"), ("spokane", "washington", "united states"),
    ("san diego", "california", "united states"), ("nuremberg", "bavaria", "germany"),
    ("nice", "provence", "france"), ("ottawa", "ontario", "canada"),
    ("quebec city", "quebec", "canada"), ("campinas", "sao paulo", "brazil"),
    ("dallas", "texas", "united states"), ("buffalo", "new york", "united states"),
)

# Languages per country, most spoken first.
COUNTRY_LANGUAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("united states", ("english", "spanish")), ("united kingdom", ("english",)),
    ("brazil", ("portuguese",)), ("india", ("hindi", "english", "marathi")),
    ("france", ("french",)), ("mexico", ("spanish",)), ("canada", ("english", "french")),
    ("germany", ("german",)), ("spain", ("spanish", "catalan")),
)

TOPICS: tuple[str, ...] = (
    "hiking", "running", "chess", "photography", "cooking", "jazz", "soccer", "yoga",
    "cycling", "gardening", "book", "film", "baking", "climbing", "surfing", "gaming",
    "knitting", "salsa", "poker", "wine", "coding", "startup", "parenting", "volunteer",
    "dog", "cat", "vegan", "comedy", "theatre", "karaoke", "basketball", "tennis",
)
BUSINESSES: tuple[str, ...] = (
    "bakery", "coffee", "pizza", "plumbing", "dental", "law office", "auto repair",
    "bookstore", "florist", "barber shop", "yoga studio", "taqueria", "sushi", "pet grooming",
)
GROUP_TEMPLATES: tuple[str, ...] = (
    "{city} {topic} club", "{city} {topic} group", "{topic} lovers of {city}", "{topic} club",
    "{last} family", "friends of {first} {last}", "{city} {topic} society", "{topic} fans",
)
PAGE_TEMPLATES: tuple[str, ...] = (
    "{first} {last} fan page", "{first} {last} official", "{last} {business}",
    "{city} {business}", "{first} {last} fans", "{topic} news {city}",
)
EVENT_TEMPLATES: tuple[str, ...] = (
    "{city} {topic} meetup", "{city} {topic} festival", "birthday party for {first} {last}",
    "{topic} night", "{last} wedding", "{city} {topic} marathon",
)
SPAM_TAG = "spam"
